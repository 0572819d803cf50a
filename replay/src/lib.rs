//! Kappa replay: rebuilds history by reading a range of the retained log
//! through the same processor code that runs live. (The replay command itself
//! arrives with the replay issue; this crate holds its place in the layout.)
