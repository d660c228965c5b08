"""torch.hub entry points: every crate_fast preset by name.

    model = torch.hub.load("/path/to/crate-fast", "crate_base", source="local", num_classes=10)

    model = torch.hub.load("/path/to/crate-fast", "crate_alpha_base", source="local", pretrained=True)

Keywords go to crate_fast.create_model (timm's names too: global_pool, drop_path_rate). Works from a plain
checkout (torch.hub puts it on sys.path; nothing needs to be pip-installed) and from an installed
crate-fast alike. ``pretrained=True`` loads the preset's released weights from the Hugging Face Hub as
crate_fast.create_model(name, pretrained=True) and timm do (huggingface_hub needed; the HF cache; the
``cache_dir`` keyword); weights that are not on the Hub raise an error naming where to fetch them by hand
(crate_fast.load_released). Nothing downloads otherwise.
"""
import importlib.abc
import importlib.util
import os
import sys

dependencies = ["torch"]

_ROOT = os.path.dirname(os.path.abspath(__file__))


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """setup.py installs the checkout's kernels/ and data/ folders as crate_fast.kernels and crate_fast.data
    (package_dir); a checkout that is not installed needs the same mapping to import. It maps exactly
    those two names to this checkout's folders, so the crate_fast torch.hub imports from the checkout
    gets its own kernels and data, never another installed version's."""

    FOLDERS = {"crate_fast.kernels": "kernels", "crate_fast.data": "data"}

    def find_spec(self, name, path=None, target=None):
        folder = self.FOLDERS.get(name)
        if folder is None:
            return None
        where = os.path.join(_ROOT, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(where, "__init__.py"),
                                                      submodule_search_locations=[where])


if "crate_fast" not in sys.modules:
    sys.meta_path.insert(0, _CheckoutFolders())

from crate_fast import list_models as _list_models  # noqa: E402
from crate_fast.timm_models import entrypoint as _entrypoint  # noqa: E402

for _name in _list_models():
    globals()[_name] = _entrypoint(_name)
