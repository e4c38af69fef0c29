"""A local Dataverse Web API simulator (see devstack/dataverse_sim.py for the entry point)."""

from devstack.dataverse.faults import Fault
from devstack.dataverse.limits import Limits
from devstack.dataverse.protocol import SimConfig
from devstack.dataverse.server import DataverseSimulator
from devstack.dataverse.store import ADMIN_PRIVILEGES, StoreConfig

__all__ = ["ADMIN_PRIVILEGES", "DataverseSimulator", "Fault", "Limits", "SimConfig", "StoreConfig"]
