"""Scaling laws for sparse and dense pre-training: robust fits, law objects, plans and plots.

Jin et al. 2025 ("The Journey Matters"): ``L = E + A/N_avg^alpha + B/D^beta``; fits as in
Besiroglu et al. 2024 (summed Huber or their Huber likelihood); the sparse law of Frantar et al.
2023; Chinchilla Approach 2 (Hoffmann et al. 2022), Kaplan et al. 2020 and the data-constrained
law of Muennighoff et al. 2023. Independent of the training code.
"""

from scaling.data_constrained import DataConstrainedLaw, fit_data_constrained
from scaling.derived import derived_intervals
from scaling.fit import ChinchillaFit, FrantarFit, fit_chinchilla, fit_frantar
from scaling.holdout import holdout
from scaling.isoflop import fit_isoflop
from scaling.kaplan import KaplanLaw, fit_kaplan
from scaling.laws import ChinchillaLaw, ComputeOptimal, FrantarLaw
from scaling.logs import ScalingTable, load_table
from scaling.plan import SparsePlan, average_density, plan_sparse
from scaling.uncertainty import Bootstrap, LeaveOneOut, bootstrap, leave_one_out

__all__ = [
    "Bootstrap",
    "ChinchillaFit",
    "ChinchillaLaw",
    "ComputeOptimal",
    "DataConstrainedLaw",
    "FrantarFit",
    "FrantarLaw",
    "KaplanLaw",
    "LeaveOneOut",
    "ScalingTable",
    "SparsePlan",
    "average_density",
    "bootstrap",
    "derived_intervals",
    "fit_data_constrained",
    "fit_isoflop",
    "fit_kaplan",
    "holdout",
    "fit_chinchilla",
    "fit_frantar",
    "leave_one_out",
    "load_table",
    "plan_sparse",
]
