from __future__ import annotations

import logging

import pytest
import transformers

from server.backbone import Backbone
from tests.tiny import make_tiny_bert

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_mlm_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-mlm"), mlm=True)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_folder) -> Backbone:
    return Backbone.load(tiny_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_mlm_backbone(tiny_mlm_folder) -> Backbone:
    return Backbone.load(tiny_mlm_folder, device="cpu", dtype="float32")
