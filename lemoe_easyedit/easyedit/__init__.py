"""The bridge to EasyEdit: everything lemoe_easyedit needs from it, in one place.

EasyEdit exists in two forms (README, "EasyEdit versions"): the registry release
``easyeditor==0.0.1.dev0`` (October 2023, written for transformers 4.30 / torch 2.0 on CUDA)
and an upstream git checkout put on ``sys.path``. The upstream form imports and runs as it
is and is used unpatched. The release is made to import and run on Python 3.11,
transformers 4.57-5.x, torch 2.x, on CPU or any GPU:

* :mod:`.release` recognises it and supplies what its import needs;
* :mod:`.devices` maps ``hparams.device`` to an existing device and rewrites its hard-coded
  ``cuda:N`` strings when it compiles;
* :mod:`.loading` imports it (:func:`load_easyeditor`) and patches what every method needs
  (``BaseEditor`` model loading, logging);
* :mod:`.registry` registers a method (:func:`register_method`);
* :mod:`.baselines` holds what only the release's ROME and MEMIT need; it is imported on
  their first call.

The bridge imports no other ``lemoe_easyedit`` module, so tools that only need EasyEdit
can use it alone.
"""

from .devices import resolve_device
from .loading import hparams_dtype, load_easyeditor
from .registry import register_method, uses_callable_restore
from .release import INSTALL_COMMAND, RELEASE_VERSION, is_release

__all__ = [
    "INSTALL_COMMAND",
    "RELEASE_VERSION",
    "load_easyeditor",
    "is_release",
    "register_method",
    "uses_callable_restore",
    "resolve_device",
    "hparams_dtype",
]
