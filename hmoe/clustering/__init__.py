"""Clustering and regrouping of experts: the math (`kmeans`: sketches, fused features, balanced k-means, SVD
residuals), the one grouping pipeline (`pipeline`), the clustering statistics (`state`), in-training regrouping
(`regroup`) and post-hoc conversion of a standard MoE (`convert`)."""
