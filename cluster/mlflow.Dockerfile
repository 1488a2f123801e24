# MLflow tracking server image for cluster/mlflow.yaml: basic-auth, PostgreSQL and S3 clients.
#   docker build -f cluster/mlflow.Dockerfile -t ghcr.io/your-org/se4lip-mlflow:3.17.2 cluster/
# Same MLflow version as the package pins (pyproject.toml), so clients and server agree.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary boto3
USER 1000:1000
ENTRYPOINT ["mlflow"]
