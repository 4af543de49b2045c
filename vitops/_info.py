"""What vitops was built with and which backend each op runs on: `python -m vitops info`."""
import platform

import torch

from vitops import _backend, _extension


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # a broken optional dependency should not break the report
        return None


def backend_info() -> dict:
    """The versions, the devices, the compiled extension's state, and for every op and device type the backend
    that runs by default and why each other backend can't."""
    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "timm": _version("timm"),
        },
        "devices": {
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if cuda else None,
        },
        "extension": {
            "loaded": _extension.LOAD_ERROR is None,
            "error": _extension.LOAD_ERROR,
            "cuda_kernels": _extension.BUILT_WITH_CUDA,
        },
        "forced_backend": _backend.forced_backend(),
        "ops": {
            op: {
                device_type: {
                    "default": _backend.default_backend(op, device_type),
                    "order": list(_backend.order(op, device_type)),
                    "unavailable": {b: reason for b, reason in reasons.items() if reason is not None},
                }
                for device_type, reasons in table.items()
            }
            for op, table in _backend.availability().items()
        },
    }


def format_info(info: dict) -> str:
    lines = ["vitops " + __import__("vitops").__version__]
    lines += [f"  {name}: {value}" for name, value in info["versions"].items()]
    lines.append(f"  cpu: {info['devices']['cpu']}")
    lines.append(f"  cuda device: {info['devices']['cuda'] or 'none'}")
    ext = info["extension"]
    if ext["loaded"]:
        lines.append(f"  vitops._C: loaded, {'with' if ext['cuda_kernels'] else 'without'} CUDA kernels")
    else:
        lines.append(f"  vitops._C: {ext['error']}")
    if info["forced_backend"]:
        lines.append(f"  forced backend: {info['forced_backend']}")
    for op, table in info["ops"].items():
        lines.append(f"\n{op}")
        for device_type, entry in table.items():
            others = [b for b in entry["order"] if b != entry["default"] and b not in entry["unavailable"]]
            fallbacks = f" (then {', '.join(others)})" if others else ""
            lines.append(f"  {device_type} tensors -> {entry['default']}{fallbacks}")
            for backend, reason in entry["unavailable"].items():
                if not reason.startswith("runs "):  # a backend of the other device type: nothing to say
                    lines.append(f"      not {backend}: {reason}")
    return "\n".join(lines)
