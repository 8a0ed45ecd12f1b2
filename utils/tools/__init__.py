"""Maintainer tools (hand-written): exporting notebook cells into `utils/`
(`python -m utils.tools.export`), re-executing notebooks and saving their outputs
(`python -m utils.tools.rerun`), the standalone copies for Colab and Kaggle
(`python -m utils.tools.standalone`), the tolerant comparison of saved outputs that the
notebook tests use (`nbcompare`), and the run of the notebook tests under several CPU
configurations (`python -m utils.tools.configs`), the GPU check (`python -m
utils.tools.gpu_check`) and the GPU memory of each training cell, counted on the CPU
(`python -m utils.tools.training_memory`).
"""
