"""Weight corpus: conversion of checkpoints into WebDataset shards, checks, and readers."""

from lsm_dist.corpus.convert import CorpusError, finalize, run_convert, run_worker
from lsm_dist.corpus.plan import ConvertConfig, make_plan

__all__ = ["ConvertConfig", "CorpusError", "finalize", "make_plan", "run_convert", "run_worker"]
