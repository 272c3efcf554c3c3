"""Python clients and a load generator for the lpt-serve HTTP API."""

from clients.client import *  # noqa: F403
from clients.client import __all__ as __all__  # one list of public names, kept in clients/client.py
