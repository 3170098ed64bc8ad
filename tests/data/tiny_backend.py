"""The smallest PEP 517 / PEP 660 build backend, for tests/test_venv_script.py: a wheel is a zip
with METADATA, WHEEL and RECORD. Inside the project (`backend-path`), so pip downloads nothing."""

import base64
import hashlib
import os
import tomllib
import zipfile


def _wheel(directory: str, files: dict[str, str]) -> str:
    with open("pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    dist = f"tiny_venv_check-{version}"
    files[f"{dist}.dist-info/METADATA"] = (
        f"Metadata-Version: 2.1\nName: tiny-venv-check\nVersion: {version}\nProvides-Extra: test\n"
    )
    files[f"{dist}.dist-info/WHEEL"] = "Wheel-Version: 1.0\nGenerator: tiny\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    name = f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"tiny.py": "VALUE = 1\n"})


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"tiny.pth": os.getcwd() + "\n"})
