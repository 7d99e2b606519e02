"""Tests of ccjax.distill against a hand computation."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import distill


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class DistillationLossTest(absltest.TestCase):

  def test_equals_hand_computation(self):
    student = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temperature = 2.0
    p = _softmax(teacher / temperature)
    q = _softmax(student / temperature)
    expected = temperature ** 2 * np.sum(p * (np.log(p) - np.log(q)), -1)
    np.testing.assert_allclose(distill.distillation_loss(student, teacher, temperature),
                               expected, rtol=1e-5)

  def test_zero_when_equal_and_no_gradient_to_teacher(self):
    logits = jnp.array([[0.3, -0.2, 1.0]])
    np.testing.assert_allclose(distill.distillation_loss(logits, logits, 3.0), [0.0], atol=1e-6)
    grad = jax.grad(lambda t: jnp.sum(distill.distillation_loss(logits + 1.0, t)))(logits)
    np.testing.assert_array_equal(grad, 0.0)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      distill.distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


if __name__ == "__main__":
  absltest.main()
