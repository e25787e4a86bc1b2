#!/bin/sh
# Random passwords for the compose stack's Redis ACL users (shared/redis_acl.py), one file per
# service in deploy/compose/secrets/ (git-ignored), read by docker-compose.yml as compose
# secrets. Existing files are kept. Rotate one: delete its file, run this again, then
# `docker compose up -d --force-recreate redis-acl redis <its service>`.
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
for service in api worker ingestion cli; do
  file="$dir/redis-$service"
  if [ ! -s "$file" ]; then
    # 0644: Compose bind-mounts file secrets as they are, and the services run as uid 10001;
    # the directory (0700) keeps other users of this host out.
    head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$file"
    chmod 644 "$file"
  fi
done
echo "Redis passwords in $dir"
