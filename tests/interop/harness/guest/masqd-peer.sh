# Shell helpers sourced by the harness-generated /peer/run.sh inside a guest.
# Results go to the host through /peer: result.txt (key=value lines), ready
# (daemon side is up), done (client side finished).

# net_up CIDR [GATEWAY]: configure the guest's only NIC (vec0).
net_up() {
  ip addr add "$1" dev vec0
  ip link set vec0 up
  if [ -n "$2" ]; then ip route add default via "$2"; fi
}

# result KEY VALUE: append one line to /peer/result.txt.
result() {
  echo "$1=$2" >> /peer/result.txt
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.5 s until it succeeds.
wait_for() {
  _limit=$(( $1 * 2 )); shift
  _i=0
  while [ "$_i" -lt "$_limit" ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5; _i=$(( _i + 1 ))
  done
  return 1
}

mark_ready() { touch /peer/ready; }
mark_done() { sync; touch /peer/done; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
