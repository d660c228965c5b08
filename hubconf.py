"""torch.hub entry points: every crate_fast preset by name.

    model = torch.hub.load("/path/to/crate-fast", "crate_base", source="local", num_classes=10)

Keywords go to crate_fast.create_model. No weights are downloaded: ``pretrained=True`` raises an error
naming the released file to fetch by hand (see the README's weights table and crate_fast.load_released).
"""
dependencies = ["torch"]

from crate_fast import list_models as _list_models  # noqa: E402
from crate_fast.timm_models import entrypoint as _entrypoint  # noqa: E402

for _name in _list_models():
    globals()[_name] = _entrypoint(_name)
