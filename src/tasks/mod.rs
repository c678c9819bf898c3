//! The paper's applications as library calls: typed config in, typed report out.
