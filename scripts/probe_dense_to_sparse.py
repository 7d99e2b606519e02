r"""Probe (issue 19): dense-then-sparsify on MNIST-1D 50k, outside the training loop.

A seed-level probe, not a ccjax recipe yet. It asks whether a 512-512 MLP trained dense,
then cut into blocks and gated at tau = 1/4 by a learned linear policy, beats the dense
net of the same MACs (width 128) trained for the same number of steps:

1. train dense 512-512 for ``--dense_steps`` (Adam, lr 0.001, batch 64);
2. optionally regroup the hidden units into blocks of co-active units (balanced k-means
   on the units' binary activation patterns over 8,000 train examples; MoEfication,
   Zhang et al. 2022) -- a permutation, so the dense function is unchanged;
3. ``--imitate_steps`` of training only the per-layer linear policies
   ``sigmoid(h Z + d)`` towards the oracle mask (the top k blocks by the L2 norm of the
   layer's own activations) with a binary cross-entropy, the network frozen;
4. ``--finetune_steps`` of joint training: the network on the task loss through the
   policy's top-k masks, the policies still imitating the oracle.

Baselines in the same process and data order: dense 128-128 (the MACs of the active
blocks, without the policies) for ``--dense_steps`` and for the pipeline's total steps;
for each block size, the dense net of the gated net's whole MACs (active blocks plus both
policies, ``ccjax.flops``; width by ``ccjax.flops.matched_dense_width``) for the total
steps; dense 512-512.

  python scripts/probe_dense_to_sparse.py --seeds=0 --json=/tmp/probe.json

The network is plain JAX here (same data, splits and batch order as ``experiments.condnet``
through ``ccjax.data``), so its numbers are not those of ``experiments.condnet``'s dense
rows (different initialisation); compare rows within one output only.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccjax import data
from ccjax import flops
from ccjax import stats
from ccjax.regroup import co_activation_permutation  # the same clustering as the recipe

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags, defined only when it runs as a program (tests import its
  functions next to other entrypoints' flags of the same names)."""
  flags.DEFINE_list("seeds", ["0"], "Seeds (network init and batch order).")
  flags.DEFINE_string("dataset", "mnist1d:50000", "Classification dataset spec.")
  flags.DEFINE_integer("dense_steps", 4000, "Dense training steps.", lower_bound=1)
  flags.DEFINE_integer("imitate_steps", 1000, "Policy-only steps.", lower_bound=0)
  flags.DEFINE_integer("finetune_steps", 1000, "Joint steps.", lower_bound=0)
  flags.DEFINE_list("block_sizes", ["8", "32"], "Units per block.")
  flags.DEFINE_multi_enum("grouping", ["contiguous", "co_activation"],
                          ["contiguous", "co_activation"],
                          "How units are grouped into blocks (repeat the flag for both).")
  flags.DEFINE_integer(
      "policy_rank", 0, "0: the paper's linear policy sigmoid(h Z + d); r > 0: Z = A B of rank r "
      "(h A is r MACs per input feature), a cheaper policy for small blocks.", lower_bound=0)
  flags.DEFINE_string("json", None, "Write the results here.")

WIDTH = 512
TAU = 0.25
BATCH = 64
LR = 1e-3


def init_mlp(key, widths, input_dim, num_classes):
  """He-initialised ``[(kernel [in, out], bias [out]), ...]``."""
  dims = [input_dim, *widths, num_classes]
  return [(jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a),
           jnp.zeros(b)) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]


def dense_logits(params, x):
  """``x [batch, features] -> logits [batch, classes]``."""
  hidden = x
  for kernel, bias in params[:-1]:
    hidden = jax.nn.relu(hidden @ kernel + bias)
  return hidden @ params[-1][0] + params[-1][1]


def top_k_blocks(scores, k):
  """``scores [batch, blocks] -> {0, 1} [batch, blocks]``, the k largest per row."""
  threshold = jnp.sort(scores, axis=-1)[:, -k][:, None]
  return (scores >= threshold).astype(jnp.float32)


def init_policy(key, input_dim: int, blocks: int, rank: int):
  """Linear policy ``(Z [in, blocks], d [blocks])``, or ``(A [in, r], B [r, blocks], d)``."""
  if rank == 0:
    return (jnp.zeros((input_dim, blocks)), jnp.zeros(blocks))
  return (jax.random.normal(key, (input_dim, rank)) / np.sqrt(input_dim),
          jnp.zeros((rank, blocks)), jnp.zeros(blocks))


def policy_logits_of(policy, hidden):
  """``hidden [batch, in] -> [batch, blocks]``: ``h Z + d`` or ``(h A) B + d``."""
  if len(policy) == 2:
    return hidden @ policy[0] + policy[1]
  return (hidden @ policy[0]) @ policy[1] + policy[2]


def gated_logits(params, policies, x, block_size):
  """Masked forward pass; returns logits, policy logits and oracle masks per layer."""
  hidden, policy_logits, oracle_masks = x, [], []
  blocks = WIDTH // block_size
  k = round(TAU * blocks)
  for (kernel, bias), policy in zip(params[:-1], policies):
    activation = jax.nn.relu(hidden @ kernel + bias)
    block_norms = (activation.reshape(len(x), blocks, block_size) ** 2).sum(-1)
    oracle = jax.lax.stop_gradient(top_k_blocks(block_norms, k))
    logits = policy_logits_of(policy, jax.lax.stop_gradient(hidden))
    block_mask = jax.lax.stop_gradient(top_k_blocks(logits, k))
    policy_logits.append(logits)
    oracle_masks.append(oracle)
    hidden = activation * jnp.repeat(block_mask, block_size, axis=1)
  return hidden @ params[-1][0] + params[-1][1], policy_logits, oracle_masks


def batches(dataset, seed, steps):
  for step in range(steps):
    batch = data.train_batch(dataset.x_train, dataset.y_train, BATCH, seed, step)
    yield (jnp.asarray(batch["x"].reshape(BATCH, -1), jnp.float32), jnp.asarray(batch["y"]))


def train(params, loss_fn, dataset, seed, steps):
  """Adam on ``loss_fn(params, x, y)`` over the run's batch order."""
  optimizer = optax.adam(LR)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for x, y in batches(dataset, seed, steps):
    params, state = step(params, state, x, y)
  return params


def task_loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def error(logits_fn, x, y) -> float:
  """Test/valid error in %."""
  logits = logits_fn(jnp.asarray(x.reshape(len(x), -1), jnp.float32))
  return float(np.mean(np.asarray(logits).argmax(-1) != y) * 100)


def permute_units(params, x, block_size, seed):
  """The same function with each hidden layer's units regrouped by co-activation."""
  params = [list(layer) for layer in params]
  hidden = x
  for i in range(len(params) - 1):
    activation = jax.nn.relu(hidden @ params[i][0] + params[i][1])
    order = co_activation_permutation(np.asarray(activation), block_size, seed)
    params[i][0], params[i][1] = params[i][0][:, order], params[i][1][order]
    params[i + 1][0] = params[i + 1][0][order, :]
    hidden = activation[:, order]
  return [tuple(layer) for layer in params]


def gated_macs(input_dim: int, num_classes: int, block_size: int, rank: int = 0) -> int:
  """MACs of one example through the gated net: the active blocks (top_k: tau of each
  layer) and both policies (the second reads the active units only); a rank-r policy
  costs ``in * r + r * blocks``."""
  active = round(TAU * WIDTH)
  blocks = WIDTH // block_size
  return (flops.dense_mlp_macs(input_dim, [active, active], num_classes)
          + flops.policy_macs(input_dim, blocks, rank) + flops.policy_macs(active, blocks, rank))


def run_seed(dataset, seed: int, matched: dict) -> dict:
  key = jax.random.PRNGKey(seed)
  input_dim = int(np.prod(dataset.x_train.shape[1:]))
  classes = int(dataset.num_classes)
  sets = {"valid": (dataset.x_valid, dataset.y_valid), "test": (dataset.x_test, dataset.y_test)}
  total = FLAGS.dense_steps + FLAGS.imitate_steps + FLAGS.finetune_steps
  rows = {}

  def record(name, logits_fn):
    rows[name] = {split: error(logits_fn, *xy) for split, xy in sets.items()}
    print(seed, name, rows[name], flush=True)

  dense_loss = lambda p, x, y: task_loss(dense_logits(p, x), y)
  wide = train(init_mlp(key, [WIDTH, WIDTH], input_dim, classes), dense_loss, dataset, seed,
               FLAGS.dense_steps)
  record(f"dense {WIDTH} ({FLAGS.dense_steps} steps)", lambda x: dense_logits(wide, x))
  for steps in sorted({FLAGS.dense_steps, total}):
    narrow = train(init_mlp(key, [128, 128], input_dim, classes), dense_loss, dataset, seed, steps)
    record(f"dense 128, same MACs ({steps} steps)", lambda x, p=narrow: dense_logits(p, x))
  sample = dataset.x_train[:8000]
  sample = jnp.asarray(sample.reshape(len(sample), -1), jnp.float32)
  rank = FLAGS.policy_rank
  policy = "" if rank == 0 else f", rank-{rank} policy"
  for block_size in map(int, FLAGS.block_sizes):
    blocks = WIDTH // block_size
    width = flops.matched_dense_width(input_dim, 2, classes,
                                      gated_macs(input_dim, classes, block_size, rank), 8)
    matched_name = f"dense {width}, MACs of the gated net with blocks of {block_size} ({total} steps)"
    if matched_name not in rows:
      same_cost = train(init_mlp(key, [width, width], input_dim, classes), dense_loss, dataset,
                        seed, total)
      record(matched_name, lambda x, p=same_cost: dense_logits(p, x))
    for clustered in [grouping == "co_activation" for grouping in FLAGS.grouping]:
      params = permute_units(wide, sample, block_size, seed) if clustered else wide
      policies = [init_policy(jax.random.fold_in(key, 7), input_dim, blocks, rank),
                  init_policy(jax.random.fold_in(key, 8), WIDTH, blocks, rank)]

      def loss(both, x, y, train_network, block_size=block_size):
        network, policy = both
        logits, policy_logits, oracle = gated_logits(network, policy, x, block_size)
        imitation = sum(optax.sigmoid_binary_cross_entropy(p, o).mean()
                        for p, o in zip(policy_logits, oracle))
        task = task_loss(logits, y)
        return imitation + (task if train_network else jax.lax.stop_gradient(task))

      both = (params, policies)
      both = train(both, lambda b, x, y: loss(b, x, y, False), dataset, seed + 1000,
                   FLAGS.imitate_steps)
      both = train(both, lambda b, x, y: loss(b, x, y, True), dataset, seed + 2000,
                   FLAGS.finetune_steps)
      name = (f"gated blocks of {block_size}, {'co-activation' if clustered else 'contiguous'}"
              f" blocks{policy} ({total} steps)")
      record(name, lambda x, b=both, s=block_size: gated_logits(b[0], b[1], x, s)[0])
      matched[name] = matched_name
  return rows


def summary(results: dict) -> str:
  """Markdown table: mean ± sample std per row, paired test-error differences of every
  gated row to the dense net of the same MACs trained for the same steps (95 % t)."""
  seeds = list(results["seeds"])
  names = list(results["seeds"][seeds[0]])
  total = results["dense_steps"] + results["imitate_steps"] + results["finetune_steps"]
  same_macs = f"dense 128, same MACs ({total} steps)"
  lines = ["| configuration | valid error (%) | test error (%) | − dense 128, same steps "
           "(points, 95 % CI) | − dense of its MACs incl. policies, same steps |",
           "|---|---|---|---|---|"]

  def paired(name, baseline):
    difference = stats.paired_difference(
        [results["seeds"][seed][name]["test"] for seed in seeds],
        [results["seeds"][seed][baseline]["test"] for seed in seeds])
    half = "" if difference.ci95 is None else f" ± {difference.ci95:.2f}"
    return f"{difference.mean:+.2f}{half}"

  for name in names:
    cells = []
    for split in ("valid", "test"):
      summary_stats = stats.mean_std([results["seeds"][seed][name][split] for seed in seeds])
      std = "" if summary_stats.std is None else f" ± {summary_stats.std:.2f}"
      cells.append(f"{summary_stats.mean:.2f}{std}")
    differences = ["", ""]
    if name in results["matched_dense"]:
      differences = [paired(name, same_macs), paired(name, results["matched_dense"][name])]
    lines.append(f"| {name} | {cells[0]} | {cells[1]} | {differences[0]} | {differences[1]} |")
  return "\n".join(lines) + f"\n\n{len(seeds)} seeds: {', '.join(seeds)}."


def main(argv):
  del argv
  dataset = data.load_dataset(FLAGS.dataset, valid_fraction=0.1, seed=0)
  started = time.time()
  results = {"dataset": FLAGS.dataset, "tau": TAU, "width": WIDTH,
             "policy_rank": FLAGS.policy_rank,
             "dense_steps": FLAGS.dense_steps, "imitate_steps": FLAGS.imitate_steps,
             "finetune_steps": FLAGS.finetune_steps,
             "matched_dense": {}}
  results["seeds"] = {seed: run_seed(dataset, int(seed), results["matched_dense"])
                      for seed in FLAGS.seeds}
  results["seconds"] = time.time() - started
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=1)
  print(summary(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
