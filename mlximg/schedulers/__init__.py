from .flow_match import FlowMatchConfig, FlowMatchEulerScheduler
from .shifts import calculate_shift, compute_empirical_mu

__all__ = ["FlowMatchConfig", "FlowMatchEulerScheduler", "calculate_shift", "compute_empirical_mu"]
