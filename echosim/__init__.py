"""echosim: predict the step time of a distributed training job from one device."""
