"""Data preparation: IDX/MNIST, KITTI odometry and image lists into Caffe Datum LMDBs."""
