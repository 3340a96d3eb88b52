"""Fixtures for the batch pipeline tests: a real S3 server on loopback and small corpora."""
from __future__ import annotations

import io
import json
import os

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
TEXTS = ["The cat sleeps on the sofa.", "Le chat dort sur le canapé.", "Die Katze schläft.",
         "El gato duerme.", "猫在沙发上睡觉。", "猫はソファで寝ている。", "Кошка спит на диване.",
         "القطة نائمة على الأريكة.", "बिल्ली सोफे पर सो रही है।", "고양이가 소파에서 자고 있다.",
         "Ο γάτος κοιμάται.", "Kedi kanepede uyuyor."]


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    """(endpoint_url, pyarrow S3FileSystem) of a moto server on 127.0.0.1, bucket `corpus`."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs
    for k, v in CREDENTIALS.items():
        monkeypatch_module.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("corpus")
    yield f"http://{host}:{port}", fs
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def put(fs, path: str, data: bytes | str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
                    + b"\n" for r in rows)


def png(width: int = 8, height: int = 8, color=(200, 30, 30)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def news_rows(n: int) -> list[dict]:
    return [{"id": f"n{i:03d}", "text": TEXTS[i % len(TEXTS)] + f" #{i}", "lang": f"l{i % 12}"}
            for i in range(n)]


def local_tree(root, files: dict[str, bytes | str]) -> str:
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return str(root)
