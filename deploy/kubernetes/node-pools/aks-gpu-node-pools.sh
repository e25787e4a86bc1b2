#!/bin/sh
# AKS: the GPU node pools that overlays/gpu/gpu-node-pool.yaml schedules onto.
#   gpu       on-demand Standard_NC24ads_A100_v4 (1x A100 80 GB, 24 vCPU): interactive, 1-8
#   gpu-spot  Spot VMs of the same size: the batch pool, 0-4 (AKS adds the taint
#             kubernetes.azure.com/scalesetpriority=spot:NoSchedule itself)
# AKS installs the NVIDIA driver on GPU pools; the nvidia.com/gpu resource comes from the NVIDIA
# device plugin DaemonSet (or the GPU Operator), installed once per cluster (docs/DEPLOYMENT.md).
# A cheaper pool: Standard_NC8as_T4_v3 (T4 16 GB) with SLUICE_QUANTIZATION=int8, SLUICE_DTYPE=float16.
# Usage: RESOURCE_GROUP=rg CLUSTER=sluice sh aks-gpu-node-pools.sh
set -eu
: "${RESOURCE_GROUP:?set RESOURCE_GROUP}" "${CLUSTER:?set CLUSTER}"

az aks nodepool add \
    --resource-group "$RESOURCE_GROUP" --cluster-name "$CLUSTER" --name gpu \
    --node-vm-size Standard_NC24ads_A100_v4 \
    --node-osdisk-size 200 \
    --enable-cluster-autoscaler --node-count 1 --min-count 1 --max-count 8 \
    --labels sluice.dev/pool=gpu \
    --node-taints nvidia.com/gpu=present:NoSchedule

az aks nodepool add \
    --resource-group "$RESOURCE_GROUP" --cluster-name "$CLUSTER" --name gpuspot \
    --node-vm-size Standard_NC24ads_A100_v4 \
    --node-osdisk-size 200 \
    --priority Spot --eviction-policy Delete --spot-max-price -1 \
    --enable-cluster-autoscaler --node-count 0 --min-count 0 --max-count 4 \
    --labels sluice.dev/pool=gpu-spot \
    --node-taints nvidia.com/gpu=present:NoSchedule,sluice.dev/spot=true:NoSchedule
