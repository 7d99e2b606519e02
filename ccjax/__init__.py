"""ccjax: conditional computation in JAX.

Block-gated networks (Bengio et al., 2015) whose per-example Bernoulli block policies
are trained with REINFORCE, and jitted inference that skips inactive blocks.
"""

from ccjax.budget import dual_update as dual_update
from ccjax.budget import lagrangian_term as lagrangian_term
from ccjax.config import ExperimentConfig as ExperimentConfig
from ccjax.config import build_model as build_model
from ccjax.conv import GatedCNN as GatedCNN
from ccjax.conv import GatedConv as GatedConv
from ccjax.conv import GatedResidualBlock as GatedResidualBlock
from ccjax.data import DATASETS as DATASETS
from ccjax.data import DataError as DataError
from ccjax.data import Dataset as Dataset
from ccjax.data import eval_batches as eval_batches
from ccjax.data import load_dataset as load_dataset
from ccjax.data import steps_per_epoch as steps_per_epoch
from ccjax.data import train_batch as train_batch
from ccjax.data import train_batch_indices as train_batch_indices
from ccjax.distill import distillation_loss as distillation_loss
from ccjax.estimators import BASELINES as BASELINES
from ccjax.estimators import BaselineState as BaselineState
from ccjax.estimators import ESTIMATORS as ESTIMATORS
from ccjax.estimators import compute_baseline as compute_baseline
from ccjax.estimators import ema_baseline_value as ema_baseline_value
from ccjax.estimators import gumbel_sigmoid_mask as gumbel_sigmoid_mask
from ccjax.estimators import init_baseline_state as init_baseline_state
from ccjax.estimators import score_function_loss as score_function_loss
from ccjax.estimators import standardized_advantage as standardized_advantage
from ccjax.estimators import straight_through_mask as straight_through_mask
from ccjax.estimators import straight_through_top_k_mask as straight_through_top_k_mask
from ccjax.estimators import update_baseline_state as update_baseline_state
from ccjax.flops import ConvLayerSpec as ConvLayerSpec
from ccjax.flops import conv2d_macs as conv2d_macs
from ccjax.flops import dense_cnn_macs as dense_cnn_macs
from ccjax.flops import dense_mlp_macs as dense_mlp_macs
from ccjax.flops import expected_gated_mlp_macs as expected_gated_mlp_macs
from ccjax.flops import gated_cnn_macs as gated_cnn_macs
from ccjax.flops import gated_mlp_macs as gated_mlp_macs
from ccjax.gating import active_fraction as active_fraction
from ccjax.gating import apply_block_mask as apply_block_mask
from ccjax.gating import expand_block_mask as expand_block_mask
from ccjax.inference.api import Capacities as Capacities
from ccjax.inference.api import calibrate_policies as calibrate_policies
from ccjax.inference.api import dense_macs_per_example as dense_macs_per_example
from ccjax.inference.api import macs_per_example as macs_per_example
from ccjax.inference.api import make_dense_inference as make_dense_inference
from ccjax.inference.api import make_inference as make_inference
from ccjax.inference.api import measure_latency as measure_latency
from ccjax.inference.info import InferenceInfo as InferenceInfo
from ccjax.inference.info import overflow_rate as overflow_rate
from ccjax.inference.kernels import BACKENDS as BACKENDS
from ccjax.inference.kernels import available_backends as available_backends
from ccjax.inference.kernels import select_backend as select_backend
from ccjax.inference.layout import BlockMajorMLP as BlockMajorMLP
from ccjax.inference.layout import to_block_major as to_block_major
from ccjax.gate_settings import GateSettings as GateSettings
from ccjax.layers import ACTIVATION_TOP_K as ACTIVATION_TOP_K
from ccjax.layers import activation_top_k_mask as activation_top_k_mask
from ccjax.layers import BlockPolicy as BlockPolicy
from ccjax.layers import GateAux as GateAux
from ccjax.layers import GatedDense as GatedDense
from ccjax.layers import GatedMLP as GatedMLP
from ccjax.layers import LayerWeights as LayerWeights
from ccjax.layers import is_policy_path as is_policy_path
from ccjax.layers import make_block_mask as make_block_mask
from ccjax.layers import param_labels as param_labels
from ccjax.layers import strip_policy_params as strip_policy_params
from ccjax.parallel import abstract_state_for as abstract_state_for
from ccjax.parallel import batch_sharding as batch_sharding
from ccjax.parallel import initialize_distributed as initialize_distributed
from ccjax.parallel import is_primary_process as is_primary_process
from ccjax.parallel import make_mesh as make_mesh
from ccjax.parallel import make_parallel_train_step as make_parallel_train_step
from ccjax.parallel import process_batch_slice as process_batch_slice
from ccjax.parallel import place_state as place_state
from ccjax.parallel import replicated_sharding as replicated_sharding
from ccjax.parallel import shard_batch as shard_batch
from ccjax.parallel import state_sharding as state_sharding
from ccjax.parallel import to_host as to_host
from ccjax.policy import THRESHOLD as THRESHOLD
from ccjax.policy import deterministic_mask as deterministic_mask
from ccjax.policy import mask_log_prob as mask_log_prob
from ccjax.policy import policy_entropy as policy_entropy
from ccjax.policy import policy_probs as policy_probs
from ccjax.policy import sample_mask as sample_mask
from ccjax.policy import threshold_mask as threshold_mask
from ccjax.policy import capped_threshold_mask as capped_threshold_mask
from ccjax.policy import top_k_capacity as top_k_capacity
from ccjax.policy import top_k_mask as top_k_mask
from ccjax.recipes import RECIPES as RECIPES
from ccjax.recipes import recipe_fields as recipe_fields
from ccjax.regroup import co_activation_permutation as co_activation_permutation
from ccjax.regroup import mlp_hidden_activations as mlp_hidden_activations
from ccjax.regroup import permute_mlp_units as permute_mlp_units
from ccjax.regroup import regroup_mlp_state as regroup_mlp_state
from ccjax.regroup import regroup_state as regroup_state
from ccjax.regroup import regroup_transformer_state as regroup_transformer_state
from ccjax.regroup import transformer_mlp_activations as transformer_mlp_activations
from ccjax.regularizers import batch_shaping_loss as batch_shaping_loss
from ccjax.regularizers import batch_shaping_prior as batch_shaping_prior
from ccjax.regularizers import block_balance_loss as block_balance_loss
from ccjax.regularizers import example_balance_loss as example_balance_loss
from ccjax.regularizers import imitation_loss as imitation_loss
from ccjax.regularizers import l2_loss as l2_loss
from ccjax.regularizers import variance_loss as variance_loss
from ccjax.schedules import ramp as ramp
from ccjax.schedules import tau_at as tau_at
from ccjax.step import TrainConfig as TrainConfig
from ccjax.step import TrainState as TrainState
from ccjax.step import init_train_state as init_train_state
from ccjax.step import make_eval_step as make_eval_step
from ccjax.step import make_optimizer as make_optimizer
from ccjax.step import make_train_step as make_train_step
from ccjax.step import top_k_capacities as top_k_capacities
from ccjax.step import policy_objective as policy_objective
from ccjax.step import REINFORCE_COSTS as REINFORCE_COSTS
from ccjax.step import reinforce_terms as reinforce_terms
from ccjax.transformer import GatedTransformer as GatedTransformer
from ccjax.transformer import init_cache as init_cache
from ccjax.validation import ConfigError as ConfigError

__version__ = "0.1.0"

# Names whose modules import orbax: loaded on first use, so `import ccjax` stays light.
_LAZY = {"Run": "ccjax.runs", "load_run": "ccjax.runs", "train_and_evaluate": "ccjax.loop"}


def __getattr__(name):
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name == "nnx":  # the NNX twins (ccjax.nnx.GatedMLP, ...), imported on first use
    return importlib.import_module("ccjax.nnx")
  raise AttributeError(f"module 'ccjax' has no attribute {name!r}")

__all__ = (
    "abstract_state_for",
    "ACTIVATION_TOP_K",
    "activation_top_k_mask",
    "active_fraction",
    "apply_block_mask",
    "available_backends",
    "BACKENDS",
    "BASELINES",
    "BaselineState",
    "batch_sharding",
    "batch_shaping_loss",
    "batch_shaping_prior",
    "block_balance_loss",
    "BlockMajorMLP",
    "BlockPolicy",
    "build_model",
    "calibrate_policies",
    "Capacities",
    "capped_threshold_mask",
    "compute_baseline",
    "ConfigError",
    "conv2d_macs",
    "ConvLayerSpec",
    "DataError",
    "Dataset",
    "DATASETS",
    "dense_cnn_macs",
    "dense_macs_per_example",
    "dense_mlp_macs",
    "deterministic_mask",
    "distillation_loss",
    "dual_update",
    "ema_baseline_value",
    "ESTIMATORS",
    "eval_batches",
    "example_balance_loss",
    "expand_block_mask",
    "expected_gated_mlp_macs",
    "ExperimentConfig",
    "GateAux",
    "GateSettings",
    "gated_cnn_macs",
    "gated_mlp_macs",
    "GatedCNN",
    "GatedConv",
    "GatedDense",
    "GatedMLP",
    "GatedResidualBlock",
    "GatedTransformer",
    "gumbel_sigmoid_mask",
    "InferenceInfo",
    "init_baseline_state",
    "init_cache",
    "init_train_state",
    "initialize_distributed",
    "is_policy_path",
    "is_primary_process",
    "l2_loss",
    "lagrangian_term",
    "LayerWeights",
    "load_dataset",
    "load_run",
    "macs_per_example",
    "make_block_mask",
    "make_dense_inference",
    "make_eval_step",
    "make_inference",
    "make_mesh",
    "make_optimizer",
    "make_parallel_train_step",
    "make_train_step",
    "mask_log_prob",
    "measure_latency",
    "overflow_rate",
    "param_labels",
    "place_state",
    "policy_entropy",
    "policy_objective",
    "policy_probs",
    "process_batch_slice",
    "ramp",
    "recipe_fields",
    "RECIPES",
    "REINFORCE_COSTS",
    "reinforce_terms",
    "replicated_sharding",
    "Run",
    "sample_mask",
    "score_function_loss",
    "select_backend",
    "shard_batch",
    "standardized_advantage",
    "state_sharding",
    "steps_per_epoch",
    "straight_through_mask",
    "straight_through_top_k_mask",
    "strip_policy_params",
    "tau_at",
    "THRESHOLD",
    "threshold_mask",
    "to_block_major",
    "to_host",
    "top_k_capacity",
    "top_k_capacities",
    "top_k_mask",
    "train_and_evaluate",
    "train_batch",
    "train_batch_indices",
    "TrainConfig",
    "TrainState",
    "update_baseline_state",
    "variance_loss",
)
