"""Caffe schema, prototxt/caffemodel I/O and the NetParameter → PyTorch translation."""
