#!/bin/sh
# One-shot MinIO setup for docker-compose.yml, safe to run again: the private bucket, the
# lifecycle rule that ages images out with the jobs' retention, and a user limited to the bucket.
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$T2I_S3_BUCKET"
mc anonymous set none "local/$T2I_S3_BUCKET"

# Every object of a job lies under {T2I_KEY_PREFIX}/{job_id}/: one rule on the prefix.
cat > /tmp/lifecycle.json <<JSON
{"Rules": [{"ID": "txt2img-retention", "Status": "Enabled",
            "Filter": {"Prefix": "$T2I_KEY_PREFIX/"}, "Expiration": {"Days": $RETENTION_DAYS}}]}
JSON
mc ilm import "local/$T2I_S3_BUCKET" < /tmp/lifecycle.json

cat > /tmp/policy.json <<JSON
{"Version": "2012-10-17",
 "Statement": [
   {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
    "Resource": ["arn:aws:s3:::$T2I_S3_BUCKET"]},
   {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
    "Resource": ["arn:aws:s3:::$T2I_S3_BUCKET/*"]}]}
JSON
mc admin policy create local txt2img /tmp/policy.json
mc admin user add local "$T2I_S3_ACCESS_KEY_ID" "$T2I_S3_SECRET_ACCESS_KEY"
mc admin policy attach local txt2img --user "$T2I_S3_ACCESS_KEY_ID" 2>/dev/null \
    || echo "policy txt2img already attached to $T2I_S3_ACCESS_KEY_ID"
echo "bucket $T2I_S3_BUCKET ready: private, images expire after $RETENTION_DAYS days"
