"""Domain LLM pipeline: data preparation, continued pre-training, SFT, evaluation, promotion.

Importing the package is cheap (no torch, ray, deepspeed, transformers or mlflow): Airflow's DAG
parser and the CLI's help load it. Heavy libraries are imported inside the stage modules.
"""

__version__ = "0.1.0"
