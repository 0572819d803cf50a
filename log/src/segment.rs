//! The embedded segment log: topics × partitions as segment files on local disk.
