"""Hardware profiles (YAML, every number sourced), cost functions and SimPy channels."""
from .profile import HardwareProfile, list_profiles, load_profile

__all__ = ["HardwareProfile", "list_profiles", "load_profile"]
