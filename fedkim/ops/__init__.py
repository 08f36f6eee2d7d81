"""Operations around the library: the served stack of local Prefect, MLflow and S3 servers (`fedkim stack`).

stack.py starts, lists and stops it; processes.py holds the process and loopback helpers it runs on.
"""
