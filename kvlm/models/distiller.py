"""Knowledge distillation of a (e.g. sparse MoE) teacher classifier into a student classifier."""

from __future__ import annotations

import keras
from keras import ops

from kvlm.models.composite import Composite

DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 3.0


def distillation_kl(teacher_logits, student_logits, temperature: float = 1.0):
    """Per-example `KL(softmax(teacher / T) || softmax(student / T))`, computed in float32."""
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    log_p_teacher = ops.log_softmax(t, axis=-1)
    log_p_student = ops.log_softmax(s, axis=-1)
    return ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)


@keras.saving.register_keras_serializable(package="kvlm")
class DistillationKL(keras.losses.Loss):
    """`KL(softmax(y_true / T) || softmax(y_pred / T))` between teacher (`y_true`) and student logits.

    Per-example values are reduced like any Keras loss (default: mean over the
    batch, sample weights applied). The `T**2` factor is left to the caller.

    Args:
        temperature: Softmax temperature `T > 0`.
    """

    def __init__(self, temperature: float = 1.0, name: str = "distillation_kl", **kwargs):
        super().__init__(name=name, **kwargs)
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        return distillation_kl(y_true, y_pred, self.temperature)

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature)
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class Distiller(Composite, keras.Model):
    """Trains a `student` classifier to match a frozen `teacher` and the labels.

    Both models map the same inputs (for `VLMClassifier`: `{"images", "token_ids"}`)
    to logits over the same classes. The teacher is frozen (`teacher.trainable =
    False`) and runs in inference mode; only the student's weights are trained.

    Loss, for labels `y`, student logits `s`, teacher logits `t` and temperature `T`:

        alpha * task_loss(y, s) + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))

    with the task loss sparse categorical cross-entropy from logits (or `loss` of
    `compile`), plus the student's own auxiliary losses (e.g. MoE load balancing
    when the student is sparse). The `T**2` factor keeps the soft-target gradients
    on the scale of the task loss's as `T` changes (Hinton et al., 2015). Sample
    weights weight both terms.

    Training loop: the loss lives in `compute_loss`, which the `train_step` and
    `test_step` of every Keras backend call with the model's output. A Keras 3
    `train_step` is backend-specific (a `tf.GradientTape`, `jax.value_and_grad`
    over stateless variables, or `torch` autograd), so overriding `compute_loss`
    rather than `train_step` gives one distillation step that runs unchanged on
    TensorFlow, JAX and PyTorch and keeps Keras's progress bar, callbacks and
    metrics. The teacher is called
    inside `compute_loss` with `training=False` behind `stop_gradient`; auxiliary
    losses the teacher adds there are left out of the total.

    `call` returns the student's logits, so `predict` gives the student's
    predictions and the `metrics` of `compile` (e.g. accuracy) score the student
    in `fit` and `evaluate` (whose `loss` is the distillation loss above). After training, `distiller.student` is the plain
    classifier to save, export or serve.

    Args:
        teacher: The trained model to distil; frozen here.
        student: The model to train.

    Example:
        >>> distiller = Distiller(teacher, student)
        >>> distiller.compile(
        ...     optimizer="adam", metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        ...     alpha=0.1, temperature=3.0,
        ... )
        >>> distiller.fit(train_data, epochs=3)
        >>> distiller.student.save("student.keras")
    """

    PARTS = ("teacher", "student")

    def __init__(self, teacher: keras.Model, student: keras.Model, **kwargs):
        super().__init__(**kwargs)
        if teacher is student:
            raise ValueError("`teacher` and `student` must be different models.")
        # Freeze every layer of the teacher. A model deserialized with trainable=False has not
        # passed the flag on to its layers, and the setter only does on a change.
        teacher.trainable = True
        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.alpha = DEFAULT_ALPHA
        self.temperature = DEFAULT_TEMPERATURE
        self.task_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.distillation_loss = DistillationKL(self.temperature)
        if teacher.built and student.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    # -- training ---------------------------------------------------------------------

    def compile(
        self,
        optimizer="rmsprop",
        metrics=None,
        alpha: float = DEFAULT_ALPHA,
        temperature: float = DEFAULT_TEMPERATURE,
        loss=None,
        **kwargs,
    ):
        """`keras.Model.compile` plus the distillation settings.

        Args:
            optimizer: The student's optimizer.
            metrics: Metrics of the student's logits against the labels.
            alpha: Weight of the task loss in [0, 1]; the soft-target term gets `1 - alpha`.
            temperature: Softmax temperature `T > 0` of the soft targets.
            loss: The task loss on `(labels, student logits)`; default sparse
                categorical cross-entropy from logits.
            **kwargs: Other `keras.Model.compile` arguments (`weighted_metrics`,
                `steps_per_execution`, `jit_compile`, ...).
        """
        if "loss_weights" in kwargs:
            raise ValueError("Distiller weighs its losses with `alpha`; leave `loss_weights` out of compile().")
        alpha = float(alpha)
        temperature = float(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha}")
        if not temperature > 0.0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
        self.alpha = alpha
        self.temperature = temperature
        self.task_loss = (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss is None else keras.losses.get(loss)
        )
        self.distillation_loss = DistillationKL(temperature)
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is None:
            return None
        config = dict(config)
        config.pop("loss_weights", None)
        config.update(
            alpha=self.alpha,
            temperature=self.temperature,
            loss=keras.saving.serialize_keras_object(self.task_loss),
        )
        return config

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """`alpha * task + (1 - alpha) * T**2 * KL(teacher || student)` plus the student's own losses."""
        if y_pred is None:
            y_pred = self(x, training=training)
        total = ops.zeros((), dtype="float32")
        if self.alpha > 0.0:
            if y is None:
                raise ValueError("Distiller needs labels `y` when `alpha > 0` (the task loss).")
            total = total + self.alpha * ops.cast(self.task_loss(y, y_pred, sample_weight=sample_weight), "float32")
        if self.alpha < 1.0:
            teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
            kl = self.distillation_loss(teacher_logits, y_pred, sample_weight=sample_weight)
            total = total + (1.0 - self.alpha) * self.temperature**2 * ops.cast(kl, "float32")
        # The frozen teacher's auxiliary losses (e.g. its MoE load balancing) are constants: leave them out.
        teacher_losses = {id(loss) for loss in self.teacher.losses}
        for extra in self.losses:
            if id(extra) not in teacher_losses:
                total = total + ops.cast(self._aggregate_additional_loss(extra), "float32")
        return total
