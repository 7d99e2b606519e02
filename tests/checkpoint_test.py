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


def small_state():
  model = ccjax.GatedMLP(hidden=(16,), num_classes=3, block_size=8)
  config = ccjax.TrainConfig(tau=0.5)
  return ccjax.init_train_state(model, config, jax.random.PRNGKey(0), jnp.zeros((2, 5)))


def test_round_trip_keeps_every_field_and_meta(tmp_path):
  state = small_state().replace(step=jnp.asarray(7, jnp.int32))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  checkpointer.save(7, state, {"architecture": {"hidden": [16]}})
  assert checkpointer.latest_step() == 7
  restored = checkpointer.restore(small_state())
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
  experiment_utils.assert_trees_equal(reopened.restore(small_state()), small_state())
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
