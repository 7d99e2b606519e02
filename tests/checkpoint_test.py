"""Tests of ccjax.checkpoint: round trip, retention, metadata, damage and torn saves."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import checkpoint as checkpoint_lib
from tests import experiment_utils


def small_state(seed: int = 0):
  model = ccjax.GatedMLP(hidden=(16,), num_classes=3, block_size=8)
  config = ccjax.TrainConfig(tau=0.5)
  return ccjax.init_train_state(model, config, jax.random.PRNGKey(seed), jnp.zeros((2, 5)))


def other_target():
  """A target of the same structure whose every float leaf differs from ``small_state()``:
  a restore that silently returned its target would fail the comparisons."""
  return jax.tree_util.tree_map(
      lambda leaf: leaf + 1 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
      small_state(seed=1))


def _assert_differs(first, second) -> None:
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)))


def test_round_trip_keeps_every_field_and_meta(tmp_path):
  state = small_state().replace(step=jnp.asarray(7, jnp.int32))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  checkpointer.save(7, state, {"architecture": {"hidden": [16]}})
  assert checkpointer.latest_step() == 7
  target = other_target()
  _assert_differs(target, state)
  restored = checkpointer.restore(target)
  experiment_utils.assert_trees_equal(state, restored)
  assert isinstance(restored, ccjax.TrainState)
  assert checkpointer.read_meta() == {"architecture": {"hidden": [16]}}
  raw = checkpointer.restore_raw()
  np.testing.assert_array_equal(raw["params"]["output"]["kernel"],
                                state.params["output"]["kernel"])
  checkpointer.close()


def test_keeps_the_two_latest(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  state = small_state()
  for step in (1, 2, 3):
    checkpointer.save(step, state, {})
  assert checkpointer.all_steps() == [2, 3]
  checkpointer.close()


def test_unfinished_save_is_ignored(tmp_path):
  directory = str(tmp_path / "ckpt")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  checkpointer.save(1, small_state(), {})
  checkpointer.close()
  # What a process killed in the middle of saving step 2 leaves behind.
  torn = os.path.join(directory, "2.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(torn, "state"))
  with open(os.path.join(torn, "state", "partial"), "wb") as stream:
    stream.write(b"\0" * 10)
  reopened = checkpoint_lib.Checkpointer(directory)
  assert reopened.latest_step() == 1
  experiment_utils.assert_trees_equal(reopened.restore(other_target()), small_state())
  reopened.close()


def test_damaged_checkpoint_raises_one_line_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  checkpointer.save(3, small_state(), {})
  for root, _, files in os.walk(os.path.join(directory, "3", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as stream:
        stream.write(b"garbage")
  with pytest.raises(checkpoint_lib.CheckpointError, match="checkpoint step 3 in") as error:
    checkpointer.restore(small_state())
  assert "\n" not in str(error.value)
  checkpointer.close()


def _flip_bit(path: str) -> None:
  with open(path, "r+b") as stream:
    data = bytearray(stream.read())
    data[len(data) // 2] ^= 1
    stream.seek(0)
    stream.write(data)


def _largest_file(directory: str) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def test_checksums_survive_later_saves_and_reopening(tmp_path):
  directory = str(tmp_path / "ckpt")
  checkpointer = checkpoint_lib.Checkpointer(directory, max_to_keep=3)
  for step in (1, 2, 3):
    checkpointer.save(step, small_state(), {"step": step})
  checkpointer.close()
  reopened = checkpoint_lib.Checkpointer(directory, max_to_keep=3)
  for step in (1, 2, 3):
    reopened.verify(step)
  assert reopened.latest_intact_step() == (3, [])
  reopened.close()


@pytest.mark.parametrize("method", ["restore", "restore_raw", "read_meta"])
def test_flipped_bit_is_never_restored(tmp_path, method):
  directory = str(tmp_path / "ckpt")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  checkpointer.save(1, small_state(), {})
  checkpointer.save(2, small_state(seed=2), {})
  _flip_bit(_largest_file(os.path.join(directory, "2", "state")))
  args = (other_target(), 2) if method == "restore" else (2,)
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="step 2 .* is damaged"):
    getattr(checkpointer, method)(*args)
  intact = checkpointer.latest_intact_step()
  assert intact.step == 1 and [step for step, _ in intact.damaged] == [2]
  assert "does not match its checksum" in intact.damaged[0][1]
  moved = checkpointer.set_aside([2])
  assert checkpointer.all_steps() == [1] and os.path.isdir(moved[0])
  experiment_utils.assert_trees_equal(checkpointer.restore(other_target()), small_state())
  checkpointer.save(2, small_state(seed=2), {})  # the step can be written again
  checkpointer.verify(2)
  checkpointer.close()


def test_save_without_checksum_file_counts_as_damaged(tmp_path):
  directory = str(tmp_path / "ckpt")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  checkpointer.save(1, small_state(), {})
  checkpointer.save(2, small_state(), {})
  # A kill between orbax's rename and the checksum file.
  os.remove(os.path.join(directory, "2", checkpoint_lib.CHECKSUM_FILE))
  intact = checkpointer.latest_intact_step()
  assert intact.step == 1 and "did not finish" in intact.damaged[0][1]
  checkpointer.close()
