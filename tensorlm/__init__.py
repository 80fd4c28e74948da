"""tensorlm: compress pretrained transformer LMs with tensor decompositions, distill, evaluate honestly."""

from tensorlm.distill import DistillConfig, distill
from tensorlm.errors import TensorLMError
from tensorlm.io import load_compressed, save_compressed
from tensorlm.models import LoadedModel, load_model
from tensorlm.params import count_parameters
from tensorlm.plan import Plan
from tensorlm.recipe import Recipe
from tensorlm.surgery import compress
from tensorlm.surgery import plan_recipe as plan
from tensorlm.version import __version__

__all__ = ["DistillConfig", "LoadedModel", "Plan", "Recipe", "TensorLMError", "compress", "count_parameters",
           "distill", "load_compressed", "load_model", "plan", "save_compressed", "__version__"]
