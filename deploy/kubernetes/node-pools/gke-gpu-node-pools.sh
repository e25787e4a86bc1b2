#!/bin/sh
# GKE: the GPU node pools that overlays/gpu/gpu-node-pool.yaml schedules onto.
#   gpu       on-demand g2-standard-8 (1x L4 24 GB, 8 vCPU, 32 GB): interactive workers, 1-8
#   gpu-spot  Spot VMs of the same shape: the batch pool, 0-4
# GKE installs the NVIDIA driver (gpu-driver-version) and the device plugin, and taints GPU
# nodes nvidia.com/gpu=present:NoSchedule itself. CUDA 13 (the GPU worker image) needs driver
# >= 580: use a GKE version whose "latest" driver is R580 or newer.
# Usage: CLUSTER=sluice REGION=us-central1 ZONE=us-central1-a sh gke-gpu-node-pools.sh
set -eu
: "${CLUSTER:?set CLUSTER}" "${REGION:?set REGION}" "${ZONE:?set ZONE (one with L4 GPUs)}"

gcloud container node-pools create gpu \
    --cluster "$CLUSTER" --region "$REGION" --node-locations "$ZONE" \
    --machine-type g2-standard-8 \
    --accelerator type=nvidia-l4,count=1,gpu-driver-version=latest \
    --disk-size 200 \
    --num-nodes 1 --enable-autoscaling --min-nodes 1 --max-nodes 8 \
    --node-labels sluice.dev/pool=gpu

gcloud container node-pools create gpu-spot \
    --cluster "$CLUSTER" --region "$REGION" --node-locations "$ZONE" \
    --machine-type g2-standard-8 \
    --accelerator type=nvidia-l4,count=1,gpu-driver-version=latest \
    --disk-size 200 \
    --spot \
    --num-nodes 0 --enable-autoscaling --min-nodes 0 --max-nodes 4 \
    --node-labels sluice.dev/pool=gpu-spot \
    --node-taints sluice.dev/spot=true:NoSchedule
