"""What a target index means, shared by the method, the Beam job and its records.

Kept in a module of its own with no TensorFlow import, so the job's settings and records can
name the sentinel without loading the model stack.

Example:
    >>> from fullgrad.targets import TARGET_PREDICTED
    >>> ke.FullGrad(model).explain(images, np.full([len(images)], TARGET_PREDICTED))
"""

__all__ = ["TARGET_PREDICTED"]

#: The target that means "explain each image's top-1 predicted class".
TARGET_PREDICTED = -1
