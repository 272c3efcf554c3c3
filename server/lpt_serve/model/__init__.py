"""The model core: the frozen backbone with its split forward, prompt generators, heads, the adapter format and
the mixed-task pass. Knows nothing of HTTP or of the store."""
