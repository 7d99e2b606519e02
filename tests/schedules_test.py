"""Tests of ccjax.schedules: values at given steps."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from ccjax import schedules


class TauAtTest(parameterized.TestCase):

  def test_constant_is_the_target(self):
    np.testing.assert_allclose(schedules.tau_at(123, (0.25, 0.5), "constant"), [0.25, 0.5])

  @parameterized.parameters(True, False)
  def test_linear_values(self, jit):
    fn = jax.jit(lambda s: schedules.tau_at(s, (0.125,), "linear", begin=100, length=400)) \
        if jit else (lambda s: schedules.tau_at(s, (0.125,), "linear", begin=100, length=400))
    for step, expected in ((0, 1.0), (100, 1.0), (300, 1.0 - 0.875 / 2), (500, 0.125),
                           (9000, 0.125)):
      np.testing.assert_allclose(fn(step), [expected], rtol=1e-6)

  def test_cosine_values(self):
    for step, expected in ((0, 1.0), (50, 1.0), (150, 0.25 + 0.75 * 0.5),
                           (250, 0.25), (1000, 0.25)):
      np.testing.assert_allclose(
          schedules.tau_at(step, (0.25,), "cosine", begin=50, length=200), [expected],
          rtol=1e-6, atol=1e-7)
    quarter = 0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 4))
    np.testing.assert_allclose(
        schedules.tau_at(100, (0.25,), "cosine", begin=50, length=200), [quarter], rtol=1e-6)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, "tau_schedule"):
      schedules.tau_at(0, (0.5,), "exponential")


class RampTest(absltest.TestCase):

  def test_values(self):
    for step, expected in ((0, 0.0), (10, 0.0), (60, 0.5), (110, 1.0), (500, 1.0)):
      np.testing.assert_allclose(schedules.ramp(step, begin=10, length=100), expected)

  def test_zero_length_is_a_step(self):
    self.assertEqual(float(schedules.ramp(9, begin=10)), 0.0)
    self.assertEqual(float(schedules.ramp(10, begin=10)), 1.0)


class AnnealTest(absltest.TestCase):

  def test_values(self):
    for step, expected in ((0, 1.0), (10, 1.0), (60, 0.5), (110, 0.0), (500, 0.0)):
      np.testing.assert_allclose(schedules.anneal(step, begin=10, length=100), expected)

  def test_zero_length_never_anneals(self):
    for step in (0, 10, 10 ** 6):
      self.assertEqual(float(schedules.anneal(step, begin=10)), 1.0)


if __name__ == "__main__":
  absltest.main()
