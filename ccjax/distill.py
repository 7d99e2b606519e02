"""Knowledge distillation loss (Hinton et al. 2015) as a pure function.

Axis letters: ``batch`` examples, ``classes`` logits.

The gated network (student) is pulled towards a teacher's softened outputs: the same
network with every block on (``mode='all'``, under ``stop_gradient``), that network as
it was at the end of the dense warm start (a frozen snapshot kept in the train state:
pretrain-then-gate), or a finished dense run. The REINFORCE cost of the policy stays the example's own task loss; distillation
only adds a gradient to the network (and, with the relaxed estimators, the policy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The self-distillation teacher (without a teacher run): ``all_on`` is the live network
# with every block on; ``snapshot`` is the network frozen at the end of the warm start.
TEACHERS = ("all_on", "snapshot")


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float = 1.0) -> jax.Array:
  """Per-example ``T^2 KL(softmax(t / T) || softmax(s / T))``.

  The ``T^2`` factor keeps the gradient scale independent of the temperature.

  Args:
    student_logits: ``[batch, classes]``.
    teacher_logits: ``[batch, classes]``; no gradient flows into them.
    temperature: softening temperature ``T > 0``.

  Returns:
    ``[batch]`` float32 losses (0 where student and teacher agree).
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student and teacher logits must have the same shape, got "
                     f"{student_logits.shape} and {teacher_logits.shape}")
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  teacher_log_p = jax.nn.log_softmax(teacher, axis=-1)
  student_log_p = jax.nn.log_softmax(student, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
  return (temperature ** 2) * kl
