"""``caffe.proto.caffe_pb2``: our schema (converter/caffe.proto, wire-compatible with BVLC's), the same module
object, so messages pass freely between pycaffe scripts and egomotion."""

import sys

from converter import caffe_pb2

sys.modules[__name__ + ".caffe_pb2"] = caffe_pb2
