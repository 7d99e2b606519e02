"""Data-parallel and multi-host placement with ``jax.sharding`` (no ``pmap``).

Axis letters: ``batch`` examples of the *global* batch, ``devices`` devices of the
mesh, ``processes`` JAX processes (hosts).

One 1-D :class:`jax.sharding.Mesh` with the axis ``data`` spans the devices in use.
Batches are sharded on their leading (``batch``) axis over ``data``; parameters,
optimizer states, the baseline state, the step and the run key are replicated (or, as
an option for wide layers, kernels are sharded along their last -- hidden units or
blocks -- axis over the same ``data`` axis). The *same* un-jitted train step from
:func:`ccjax.make_train_step` then runs on 1 or N devices:
``jax.jit(train_step, donate_argnums=0)`` is written against the global arrays, so
every ``jnp.mean`` over the batch axis -- the task loss, the per-example REINFORCE
costs and their ``batch_mean``/``ema`` baselines, and the batch statistics of ``L_b``,
``L_e`` and ``L_v`` -- is a mean over the **global** batch; XLA inserts the
cross-device reductions. Mask sampling is sharding-invariant because
``jax_threefry_partitionable`` (on by default) makes ``jax.random`` draw the same bits
for an array whatever its sharding. :func:`make_parallel_train_step` only pins the
input and output shardings so that the state keeps its placement step after step.

Multi-host: every process runs the same program. Call :func:`initialize_distributed`
first (before anything touches a device), build the mesh with :func:`make_mesh` (it
spans all processes), place the state with :func:`place_state` and each batch with
:func:`shard_batch`; only :func:`is_primary_process` writes metrics, results and plots.
orbax checkpoints of such a state are written cooperatively by all processes; restore
them onto any mesh with a target from :func:`abstract_state_for`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

DATA_AXIS = "data"
AUTO_COORDINATOR = "auto"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           initialization_timeout: int = 300) -> bool:
  """Joins a multi-process (multi-host) JAX job, if multi-host settings are given.

  Must run before any other JAX call touches a device. With all three settings
  ``None`` nothing happens (a single-process run). ``coordinator_address='auto'`` with
  the other two ``None`` calls ``jax.distributed.initialize()`` without arguments,
  which detects the settings on Cloud TPU pod slices, SLURM, Open MPI and Kubernetes
  (GKE) clusters.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service, reachable
      from every process (the same value on all), or ``'auto'``.
    num_processes: number of processes in the job, >= 1.
    process_id: this process's index, in ``[0, num_processes)``; process 0 hosts the
      coordinator.
    initialization_timeout: seconds to wait for all processes to join.

  Returns:
    True if ``jax.distributed.initialize`` was called.

  Raises:
    ValueError: settings given only in part, or out of range.
  """
  if coordinator_address == AUTO_COORDINATOR:
    if num_processes is not None or process_id is not None:
      raise ValueError("coordinator_address='auto' detects num_processes and process_id; "
                       "leave --num_processes and --process_id unset")
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return True
  settings = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = [name for name, value in settings.items() if value is not None]
  if not given:
    return False
  if len(given) != len(settings):
    missing = [name for name in settings if name not in given]
    raise ValueError(f"multi-host settings must be given all or none: got {', '.join(given)} "
                     f"without {', '.join(missing)}")
  if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
    raise ValueError(f"coordinator_address must be 'host:port' or 'auto', "
                     f"got {coordinator_address!r}")
  if not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
    raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
  if not isinstance(process_id, (int, np.integer)) or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be an integer in [0, num_processes={num_processes}), "
                     f"got {process_id!r}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=int(num_processes), process_id=int(process_id),
                             initialization_timeout=initialization_timeout)
  return True


def is_primary_process() -> bool:
  """True on process 0, the only one that should write metrics, results and plots."""
  return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with the axis ``data`` over the devices to use.

  Single process: the first ``num_devices`` of ``jax.devices()``. Multi-process: every
  process must take part (each feeds its own slice of the batch), so each contributes
  its first ``num_devices / process_count`` local devices; the mesh is ordered by
  process, so each process's devices hold a contiguous slice of the global batch.

  Args:
    num_devices: devices in the mesh; ``None`` = all ``jax.device_count()``. Must be in
      ``[1, jax.device_count()]`` and, in multi-process runs, a multiple of
      ``jax.process_count()`` using at most ``jax.local_device_count()`` per process.

  Returns:
    ``Mesh`` of shape ``{data: num_devices}``.

  Raises:
    ValueError: ``num_devices`` out of range or not evenly spread over processes.
  """
  total = jax.device_count()
  if num_devices is None:
    num_devices = total
  if not isinstance(num_devices, (int, np.integer)) or not 1 <= num_devices <= total:
    raise ValueError(f"num_devices must be an integer in [1, {total}] (jax.device_count()), "
                     f"got {num_devices!r}")
  num_processes = jax.process_count()
  if num_processes == 1:
    devices = jax.devices()[:num_devices]
  else:
    per_process, remainder = divmod(int(num_devices), num_processes)
    local = jax.local_device_count()
    if remainder or per_process > local:
      raise ValueError(
          f"num_devices must be a multiple of the process count ({num_processes}) and at "
          f"most {local} (local devices) per process, so that every process takes part; "
          f"got {num_devices}")
    by_process: dict[int, list[Any]] = {}
    for device in jax.devices():
      by_process.setdefault(device.process_index, []).append(device)
    devices = [device for index in sorted(by_process)
               for device in sorted(by_process[index], key=lambda d: d.id)[:per_process]]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of ``[batch, ...]`` arrays: the leading axis split over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def state_sharding(tree: Any, mesh: Mesh, *, shard_hidden: bool = False,
                   min_shard_units: int = 1) -> Any:
  """Shardings for a parameter / optimizer / train-state pytree.

  Args:
    tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. a :class:`ccjax.TrainState`,
      or its ``jax.eval_shape``).
    mesh: a mesh from :func:`make_mesh`.
    shard_hidden: if True, every leaf of rank >= 2 (dense kernels ``[in, units]``,
      policy kernels ``[in, blocks]`` and the matching optimizer moments) whose last
      axis is divisible by the mesh size is split along that axis over ``data``; the
      rest is replicated. Memory per device then falls with the mesh size for wide
      layers, at the cost of an all-gather per layer. If False, all is replicated.
    min_shard_units: with ``shard_hidden``, only split if each device gets at least
      this many units (columns).

  Returns:
    a pytree of :class:`NamedSharding` with the structure of ``tree``.
  """
  replicated = replicated_sharding(mesh)
  size = mesh.devices.size

  def choose(leaf):
    shape = np.shape(leaf)
    if (shard_hidden and len(shape) >= 2 and shape[-1] % size == 0
        and shape[-1] // size >= min_shard_units):
      return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), DATA_AXIS))
    return replicated

  return jax.tree_util.tree_map(choose, tree)


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  # Multi-process: every process holds the whole value (same seed, same init) and
  # contributes the pieces its own devices need.
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(value)
    data = _place(jax.random.key_data(value), sharding)
    return jax.random.wrap_key_data(data, impl=impl)
  host_value = np.asarray(value)
  return jax.make_array_from_callback(host_value.shape, sharding,
                                      lambda index: host_value[index])


def place_state(tree: Any, mesh: Mesh, *, shard_hidden: bool = False,
                min_shard_units: int = 1) -> Any:
  """Places a state pytree on ``mesh``: replicated, or hidden-sharded for wide layers.

  In multi-process runs every process must pass the same values (build the state from
  the same seed on every process).

  Args:
    tree: pytree of arrays (parameters, optimizer state, a whole ``TrainState``).
    mesh: a mesh from :func:`make_mesh`.
    shard_hidden: split wide kernels along their last axis, see :func:`state_sharding`.
    min_shard_units: see :func:`state_sharding`.

  Returns:
    the same pytree of global ``jax.Array`` placed with :func:`state_sharding`.
  """
  shardings = state_sharding(tree, mesh, shard_hidden=shard_hidden,
                             min_shard_units=min_shard_units)
  return jax.tree_util.tree_map(_place, tree, shardings)


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
  """The rows of the global batch that this process's devices hold.

  A data loader may read only these rows and pass them to
  ``shard_batch(..., process_local=True)``.

  Args:
    global_batch_size: rows of the global batch; divisible by the mesh size.
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    a contiguous ``slice`` of ``[0, global_batch_size)``.
  """
  _check_batch_size(global_batch_size, mesh)
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = [index[0].start or 0 for index in indices.values()]
  stops = [global_batch_size if index[0].stop is None else index[0].stop
           for index in indices.values()]
  return slice(min(starts), max(stops))


def _check_batch_size(batch_size: int, mesh: Mesh) -> None:
  size = mesh.devices.size
  if batch_size % size:
    raise ValueError(f"batch_size (global) must be a multiple of the number of devices "
                     f"({size}), got {batch_size}")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *,
                process_local: bool = False) -> dict[str, jax.Array]:
  """Places a batch on ``mesh`` with its leading axis split over ``data``.

  Args:
    batch: dict of numpy arrays ``[batch, ...]`` (e.g. ``x [batch, features]``,
      ``y [batch]``), all with the same leading size. By default this is the **global**
      batch (in multi-process runs the same on every process; each process keeps only
      its own rows, :func:`process_batch_slice`). With ``process_local=True`` it is only
      this process's rows, and the global batch is their concatenation over processes
      in process order.
    mesh: a mesh from :func:`make_mesh`.
    process_local: see ``batch``.

  Returns:
    dict of global ``jax.Array`` ``[global_batch, ...]`` sharded by :func:`batch_sharding`.

  Raises:
    ValueError: arrays with different leading sizes, or a global batch size not
      divisible by the mesh size.
  """
  sizes = {name: np.shape(value)[0] if np.ndim(value) else None for name, value in batch.items()}
  if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
    raise ValueError(f"batch must be a non-empty dict of arrays [batch, ...] with one leading "
                     f"size, got leading sizes {sizes}")
  local_size = next(iter(sizes.values()))
  sharding = batch_sharding(mesh)
  if process_local:
    processes = {device.process_index for device in mesh.devices.flat}
    global_size = local_size * len(processes)
  else:
    global_size = local_size
  _check_batch_size(global_size, mesh)
  placed = {}
  for name, value in batch.items():
    value = np.asarray(value)
    global_shape = (global_size,) + value.shape[1:]
    if sharding.is_fully_addressable:
      placed[name] = jax.device_put(value, sharding)
    else:
      placed[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return placed


def to_host(tree: Any) -> Any:
  """Copies a pytree of (possibly multi-process) global arrays to numpy on every process.

  Replicated arrays (metrics from :func:`make_parallel_train_step`) are read from a
  local copy; arrays split across processes are all-gathered, which every process
  must call together.

  Args:
    tree: pytree of ``jax.Array`` (or numpy / Python scalars, passed through).

  Returns:
    the same pytree of ``numpy.ndarray`` with the global shapes.
  """

  def fetch(leaf):
    if not isinstance(leaf, jax.Array):
      return np.asarray(leaf)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.is_fully_addressable:
      return np.asarray(leaf)
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree_util.tree_map(fetch, tree)


def make_parallel_train_step(train_step: Callable[[Any, Any], tuple[Any, Any]], mesh: Mesh,
                             state_shardings: Any, *, donate: bool = True
                             ) -> Callable[[Any, Any], tuple[Any, Any]]:
  """Jits a pure train step for ``mesh``: global-batch semantics on any device count.

  ``jax.jit(train_step, donate_argnums=0)`` applied to inputs placed by
  :func:`place_state` and :func:`shard_batch` already computes the same update as on one
  device; this wrapper also pins the shardings so the returned state keeps the input
  state's placement (needed with ``shard_hidden``, and it avoids recompiles).

  Args:
    train_step: pure ``(state, batch) -> (state, metrics)``, e.g. from
      :func:`ccjax.make_train_step`; batch arrays ``[global_batch, ...]``.
    mesh: a mesh from :func:`make_mesh`.
    state_shardings: pytree of shardings of the state, from :func:`state_sharding`.
    donate: donate the input state's buffers to the output.

  Returns:
    the jitted step; metrics come back replicated (readable on every process).
  """
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated_sharding(mesh)),
                 donate_argnums=(0,) if donate else ())


def abstract_state_for(state_or_shape: Any, mesh: Mesh, *, shard_hidden: bool = False,
                       min_shard_units: int = 1) -> Any:
  """A restore target that places a checkpoint onto ``mesh``.

  Checkpoints hold global arrays, independent of the device count they were written
  with; restoring against this target (``orbax`` ``StandardCheckpointer.restore`` /
  ``StandardRestore``, or :meth:`ccjax.checkpoint.Checkpointer.restore`) reads each
  array straight into this mesh's shardings, e.g. a state trained on 8 devices onto 1
  and vice versa.

  Args:
    state_or_shape: a state pytree of arrays, or its ``jax.eval_shape`` (a tree of
      ``jax.ShapeDtypeStruct``), e.g. ``jax.eval_shape(init_fn, rng)``.
    mesh: the mesh to restore onto.
    shard_hidden: as for :func:`place_state`.
    min_shard_units: as for :func:`place_state`.

  Returns:
    the same pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.
  """
  shardings = state_sharding(state_or_shape, mesh, shard_hidden=shard_hidden,
                             min_shard_units=min_shard_units)
  return jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding),
      state_or_shape, shardings)
