"""Data in: the spots of a bundle as a model sees them, batches of views, augmentation."""
