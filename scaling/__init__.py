"""Scaling laws for sparse and dense pre-training: robust fits, law objects, plans and plots.

Jin et al. 2025 ("The Journey Matters"): ``L = E + A/N_avg^alpha + B/D^beta``; fits as in
Besiroglu et al. 2024; the sparse law of Frantar et al. 2023. Independent of the training code.
"""

from scaling.fit import ChinchillaFit, FrantarFit, fit_chinchilla, fit_frantar
from scaling.laws import ChinchillaLaw, ComputeOptimal, FrantarLaw
from scaling.logs import ScalingTable, load_table
from scaling.plan import SparsePlan, average_density, plan_sparse
from scaling.uncertainty import Bootstrap, LeaveOneOut, bootstrap, leave_one_out

__all__ = [
    "Bootstrap",
    "ChinchillaFit",
    "ChinchillaLaw",
    "ComputeOptimal",
    "FrantarFit",
    "FrantarLaw",
    "LeaveOneOut",
    "ScalingTable",
    "SparsePlan",
    "average_density",
    "bootstrap",
    "fit_chinchilla",
    "fit_frantar",
    "leave_one_out",
    "load_table",
    "plan_sparse",
]
