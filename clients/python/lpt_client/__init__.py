"""Python clients and a load generator for the lpt-serve HTTP API."""

from lpt_client.client import *  # noqa: F403
from lpt_client.client import __all__ as __all__  # one list of public names, kept in clients/client.py
