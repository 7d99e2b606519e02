"""ccjax: conditional computation in JAX.

Block-gated networks (Bengio et al., 2015) whose per-example Bernoulli block policies
are trained with REINFORCE, and jitted inference that skips inactive blocks.
"""

from ccjax.conv import GateLayer as GateLayer
from ccjax.conv import GatedCNN as GatedCNN
from ccjax.conv import GatedConv as GatedConv
from ccjax.conv import GatedResidualBlock as GatedResidualBlock
from ccjax.conv import strip_policy_params as strip_policy_params
from ccjax.conv_sparse import CNNInferenceInfo as CNNInferenceInfo
from ccjax.conv_sparse import bench_cnn as bench_cnn
from ccjax.conv_sparse import calibrate_policies as calibrate_policies
from ccjax.conv_sparse import make_cnn_inference as make_cnn_inference
from ccjax.data import DATASETS as DATASETS
from ccjax.data import DataError as DataError
from ccjax.data import Dataset as Dataset
from ccjax.data import eval_batches as eval_batches
from ccjax.data import load_dataset as load_dataset
from ccjax.data import steps_per_epoch as steps_per_epoch
from ccjax.data import train_batch as train_batch
from ccjax.data import train_batch_indices as train_batch_indices
from ccjax.estimators import BASELINES as BASELINES
from ccjax.estimators import BaselineState as BaselineState
from ccjax.estimators import ESTIMATORS as ESTIMATORS
from ccjax.estimators import compute_baseline as compute_baseline
from ccjax.estimators import ema_baseline_value as ema_baseline_value
from ccjax.estimators import gumbel_sigmoid_mask as gumbel_sigmoid_mask
from ccjax.estimators import init_baseline_state as init_baseline_state
from ccjax.estimators import score_function_loss as score_function_loss
from ccjax.estimators import straight_through_mask as straight_through_mask
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
from ccjax.layers import BlockPolicy as BlockPolicy
from ccjax.layers import GateAux as GateAux
from ccjax.layers import GatedDense as GatedDense
from ccjax.layers import GatedMLP as GatedMLP
from ccjax.layers import make_block_mask as make_block_mask
from ccjax.layers import param_labels as param_labels
from ccjax.parallel import abstract_state_for as abstract_state_for
from ccjax.parallel import batch_sharding as batch_sharding
from ccjax.parallel import initialize_distributed as initialize_distributed
from ccjax.parallel import is_primary_process as is_primary_process
from ccjax.parallel import make_mesh as make_mesh
from ccjax.parallel import make_parallel_train_step as make_parallel_train_step
from ccjax.parallel import process_batch_slice as process_batch_slice
from ccjax.parallel import replicate as replicate
from ccjax.parallel import replicated_sharding as replicated_sharding
from ccjax.parallel import shard_batch as shard_batch
from ccjax.parallel import state_sharding as state_sharding
from ccjax.parallel import to_host as to_host
from ccjax.policy import deterministic_mask as deterministic_mask
from ccjax.policy import mask_log_prob as mask_log_prob
from ccjax.policy import policy_entropy as policy_entropy
from ccjax.policy import policy_probs as policy_probs
from ccjax.policy import sample_mask as sample_mask
from ccjax.policy import threshold_mask as threshold_mask
from ccjax.policy import top_k_mask as top_k_mask
from ccjax.regularizers import block_balance_loss as block_balance_loss
from ccjax.regularizers import example_balance_loss as example_balance_loss
from ccjax.regularizers import l2_loss as l2_loss
from ccjax.regularizers import variance_loss as variance_loss
from ccjax.train import TrainConfig as TrainConfig
from ccjax.train import TrainState as TrainState
from ccjax.train import init_train_state as init_train_state
from ccjax.train import make_eval_step as make_eval_step
from ccjax.train import make_optimizer as make_optimizer
from ccjax.train import make_train_step as make_train_step
from ccjax.train import policy_objective as policy_objective

__version__ = "0.1.0"
