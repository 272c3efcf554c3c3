"""The HTTP edge: settings, the app factory, one router per resource, the error table, the dashboard, logs and the
`lpt-serve` entry point."""
