# The guest's common environment, sourced by stage2, the agent and the scenario.
# The test writes $VM/env (its values) into the share before booting.
VM=/share/.vm
. "$VM/env"
PATH=/vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
SHARE=/share
LANG=C.UTF-8
export PATH HOME SHARE LANG VM FEEDBACK_INSTALL_ROOT FEEDBACK_CHECKOUT FEEDBACK_PYTHON
