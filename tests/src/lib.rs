//! The netns testbed. (Skeleton.)
