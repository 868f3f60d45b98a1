"""reward_service"""
