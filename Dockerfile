FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HOTFIX_HOST=0.0.0.0 HOTFIX_PORT=7860 HOTFIX_RUNS_DIR=/data/runs
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
EXPOSE 7860
CMD ["python", "app.py"]
