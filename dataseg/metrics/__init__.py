"""Evaluators (panoptic PQ, semantic mIoU, COCO mask / box AP) and standard-format exports.

`make_evaluator(name, class_names=..., is_thing=...)` builds one by name; see evaluators.py
for the add / state / gather / result protocol.
"""

from dataseg.metrics.evaluators import Evaluator
from dataseg.metrics.evaluators import gather
from dataseg.metrics.evaluators import make_evaluator
from dataseg.metrics.evaluators import register
