"""The matmul forms the quartet2 pass rewrites, in the order the matcher tries them.

A new form is one module here (an object with the ``forms.base.MatmulForm`` methods) added to
``FORMS``, plus its tests.
"""

from quartet_compile.passes.forms.base import MatmulForm
from quartet_compile.passes.forms.grouped import GROUPED_EXPERTS
from quartet_compile.passes.forms.linear import CONV1D, LINEAR

FORMS: tuple[MatmulForm, ...] = (LINEAR, CONV1D, GROUPED_EXPERTS)

__all__ = ["FORMS", "MatmulForm"]
