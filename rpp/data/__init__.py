"""Datasets, the leave-last-out split and candidate sampling. Knows nothing of LLMs or RL."""
from rpp.data.dataset import DataError, Dataset, load_csv, load_dataset, load_ml1m, load_ml100k
from rpp.data.split import Split, UserSample, dataset_stats, sample_candidates, split_users

__all__ = ["DataError", "Dataset", "Split", "UserSample", "dataset_stats", "load_csv", "load_dataset",
           "load_ml1m", "load_ml100k", "sample_candidates", "split_users"]
