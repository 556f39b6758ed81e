"""Host paging (ESX's third primitive): a zram swap tier owned by the daemon, guest-guided
page-out of a VM's cold memory, and idle VMs parked (paused, paged out) and woken with prefetch."""
